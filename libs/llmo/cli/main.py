import click


@click.group()
def cli() -> None:
    """LLMO platform command line."""


def main() -> None:
    cli()
