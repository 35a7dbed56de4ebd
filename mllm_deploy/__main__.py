import sys

from mllm_deploy.cli import main

sys.exit(main())
