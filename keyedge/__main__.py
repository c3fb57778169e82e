"""``python -m keyedge`` runs the CLI."""

from keyedge.cli import main

main()
