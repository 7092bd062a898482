"""``python -m edgepack.cli``: the same command as the ``edgepack`` script."""

from edgepack.cli import main

main()
