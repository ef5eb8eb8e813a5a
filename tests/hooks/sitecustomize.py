"""Put on PYTHONPATH by the resume tests: a run whose environment sets MORA_TEST_KILL_AT_STEP=N is SIGKILLed whole
(its launcher and every rank, as when a node dies: each process that inherited the setting) right after process 0
has logged step N's training record. The kill lands at the same step on any machine, however slow or busy: no test
races the clock to kill a run before it ends. Nothing happens in a process whose environment does not set it."""

import os

STEP = os.environ.get("MORA_TEST_KILL_AT_STEP")

if STEP:
    import importlib.abc
    import importlib.util
    import signal
    import sys

    def _kill_the_run() -> None:
        import psutil

        for process in psutil.process_iter():  # the launchers and the other ranks first, then this rank
            try:
                if process.pid != os.getpid() and process.environ().get("MORA_TEST_KILL_AT_STEP") == STEP:
                    process.kill()
            except psutil.Error:  # gone meanwhile, or not ours to read
                continue
        os.kill(os.getpid(), signal.SIGKILL)

    def _patch(engine) -> None:
        write = engine.MetricsLog.write

        def write_then_die(self, record):
            write(self, record)
            if self.enabled and "lr" in record and record["step"] == int(STEP):
                _kill_the_run()

        engine.MetricsLog.write = write_then_die

    class _PatchTheEngine(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "mora.training.run":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchTheEngine())
