"""Command-line tools for training data: ``python -m data.tools.<name> --help``.

- ``pack``    an image folder tree (one folder per identity) -> train.rec / train.idx / property
- ``shuffle`` a rec -> a new rec in random order (the layout DALI's reader needs), with or without header
- ``inspect`` counts, label range, file order, damaged / undecodable records of a rec
"""
