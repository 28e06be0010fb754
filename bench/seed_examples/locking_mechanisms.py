# ruff: noqa  (kept exactly as the seed README has it)
# The seed README's "Locking Mechanisms" example, as written there.
import pype
import time
import ray


@ray.remote
def f(server):
    while True:
        if ray.get(server.can_pull.remote('data')):
            data = ray.get(server.pull.remote('data'))
        else:
            time.sleep(1e-4)


ray.init()
server = pype.Server.remote()
server.add.remote('data', use_locking=True)
f.remote(server)

for i in range(20):
    while True:
        if ray.get(server.can_push.remote('data')):
            break
        else:
            time.sleep(1e-3)
    server.push.remote(i, 'data')
    server.print_queue.remote('data')

time.sleep(3)
ray.shutdown()
