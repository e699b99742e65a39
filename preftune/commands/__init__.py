"""The preftune command line: one table of commands, each with its flags next to its code."""
