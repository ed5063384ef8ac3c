"""``python -m wordlm.evaluation checkpoint=PATH ...``: the evaluate command."""

from .command import main

main()
