"""``python -m wordlm.evaluate``: kept so the command documented before evaluation moved into
:mod:`wordlm.evaluation` keeps working. The code is :mod:`wordlm.evaluation.command`."""

from .evaluation.command import main

if __name__ == "__main__":
    main()
