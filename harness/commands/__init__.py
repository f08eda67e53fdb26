"""`harness <command>`: one module per command, each with one function of the same name that typer registers
(harness/cli.py, one line each). A command module imports only what `harness --help` can afford at the top
(typer, rich, the config and registries); what a command runs (Ray, torch, MLflow, TRL, lm-eval) is imported
inside its function, with the reason beside it. A `UserError` raised anywhere below becomes one line and exit 2
in one place: harness/cli.py."""
