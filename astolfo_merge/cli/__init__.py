"""The command line, `python -m astolfo_merge ...`: thin clients of the library, one module per family of
sub-commands. The top of the arrows: nothing imports cli except __main__."""
