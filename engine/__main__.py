import os

from .cli import main
from .distributed import end_rank_process

code = main()
if os.environ.get("WORLD_SIZE", "1") != "1":  # a torchrun rank: see end_rank_process
    end_rank_process(code)
raise SystemExit(code)
