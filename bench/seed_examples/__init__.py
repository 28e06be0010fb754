"""The seed README's two long examples, verbatim: the tests run them, the bench measures the chain."""
