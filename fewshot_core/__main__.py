import sys

from fewshot_core.cli import main

sys.exit(main())
