from vitrine.cli import app

app()
