"""``python run_cli_with_hooks.py SPECS ARGS...``: the tract-dist CLI with test hooks installed in this process
(SPECS: a JSON list of ``{"target", "options"}``), for tests that run the CLI as a subprocess. Production has no
way to install a hook from outside the process."""

import json
import sys

from tract_dist.cli import main
from tract_dist.train.hooks import HookSpec, install_hooks

if __name__ == "__main__":
    install_hooks(*(HookSpec.from_dict(d) for d in json.loads(sys.argv[1])))
    sys.exit(main(sys.argv[2:]))
