#!/usr/bin/env python
"""Train a word-level language model: ``python train.py [key=value ...]`` (see README.md)."""

from wordlm.cli import train_main

if __name__ == "__main__":
    train_main()
