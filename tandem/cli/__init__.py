"""The `tandem` command. Entry point: `tandem.cli.main:main`."""
