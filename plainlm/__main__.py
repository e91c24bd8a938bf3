"""`python -m plainlm`, the `plainlm` command; also what `torchrun -m plainlm` runs in each process."""

import os

from plainlm.cli import main

if __name__ == "__main__":  # guarded: spawned worker processes import this module again
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun (torch imported only there: --help stays fast)
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)  # an uncaught error is recorded for torchrun to report as this rank's
    main()
