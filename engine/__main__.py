import os

from .cli import main
from .distributed import end_rank_process

code = main()
if code == 0 and os.environ.get("WORLD_SIZE", "1") != "1":  # a torchrun rank that succeeded: see end_rank_process
    end_rank_process(code)
raise SystemExit(code)
