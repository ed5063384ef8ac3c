#!/usr/bin/env python
"""Export a checkpoint for serving: ``python export.py checkpoint=PATH [format=onnx] [out=FILE]`` (see README.md)."""

from wordlm.export import main

if __name__ == "__main__":
    main()
