#!/usr/bin/env python
"""Sample text from a checkpoint: ``python generate.py checkpoint=PATH [words=...] [prompt="..."]`` (see README.md)."""

from wordlm.generate import main

if __name__ == "__main__":
    main()
