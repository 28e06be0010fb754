"""The error classes derive from what pype/errors.py and the README say they do."""

import inspect
import queue

import pytest

import pype
from pype import errors

BUILTIN_BASES = {
    pype.QueueExistsError: ValueError,
    pype.ConfigError: ValueError,
    pype.ServerExistsError: ValueError,
    pype.QueueNotFoundError: LookupError,
    pype.LeaseNotHeldError: LookupError,
    pype.ServerNotFoundError: LookupError,
    pype.QueueTimeoutError: TimeoutError,
    pype.VideoSourceError: OSError,
    pype.QueueFullError: None,
    pype.ShardLostError: None,
    pype.ShardUnavailableError: ConnectionError,
    pype.ShardRestartedError: ConnectionError,
    pype.ItemLostError: None,
    pype.JournalFormatError: ValueError,
    pype.RedirectLimitError: None,
    pype.NotPrimaryError: ConnectionError,
    pype.NotEnoughReplicasError: None,
    pype.StaleEpochError: None,
    pype.Empty: queue.Empty,
    pype.Full: queue.Full,
}


def test_every_error_class_is_listed_here():
    classes = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, pype.PypeError) and cls is not pype.PypeError}
    assert classes == set(BUILTIN_BASES)


@pytest.mark.parametrize("cls, builtin", BUILTIN_BASES.items(), ids=lambda x: getattr(x, "__name__", ""))
def test_each_error_derives_from_the_builtin_its_docstring_names(cls, builtin):
    assert issubclass(cls, pype.PypeError)
    others = [base for base in cls.__mro__[1:]
              if not issubclass(base, pype.PypeError) and base not in (Exception, BaseException, object)]
    if builtin is None:
        assert others == [], f"{cls.__name__} derives from {others} but the docstring says none"
        assert cls.__name__ in errors.__doc__.split("derive from PypeError alone")[0].split(". ")[-1]
    else:
        assert builtin in others
        assert builtin.__name__ in errors.__doc__
