#!/usr/bin/env python
"""Score a checkpoint on a split: ``python evaluate.py checkpoint=PATH [split=test]`` (see README.md)."""

from wordlm.evaluation.command import main

if __name__ == "__main__":
    main()
