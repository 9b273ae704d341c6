"""`python -m shardllm.envs`: the SHARDLLM_* variables' table, as `shardllm envs` prints it."""

import sys

from shardllm.envs import main

sys.exit(main())
