"""The ``blockgraph`` command line; each subcommand is registered through the plugin hook."""
