"""The shipped recipes: YAML files, installed as the package data of s2cli.recipes (`s2 recipes` lists them)."""
