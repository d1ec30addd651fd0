"""``python -m alphaengine`` runs the command line."""

from alphaengine.cli import main

main()
