"""python -m kcompile"""
from kcompile.cli import main

main()
