"""`python -m pacore.cli`: the `pacore` command tree."""

from __future__ import annotations

from pacore.cli import main

main()
