"""`python -m edgepeft.cli ...` runs the command line."""

from edgepeft.cli import main

main()
