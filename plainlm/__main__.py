"""`python -m plainlm`, the `plainlm` command; also what `torchrun -m plainlm` runs in each process."""

from torch.distributed.elastic.multiprocessing.errors import record

from plainlm.cli import main

if __name__ == "__main__":  # guarded: spawned worker processes import this module again
    record(main)()  # under torchrun, an uncaught error is recorded for torchrun to report as this rank's
