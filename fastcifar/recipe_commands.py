"""`fastcifar recipes`: the built-in recipes, one recipe resolved (`show`), every key (`keys`). Torch-free."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from fastcifar.errors import DataError
from fastcifar.recipe import Recipe, builtin_recipes, load_recipe, recipe_description, recipe_to_toml
from fastcifar.stores import locate_store
from fastcifar.typed_toml import key_reference

# TOML to copy: no markup, no highlighting, and no line breaks of rich's own even in a terminal (a wrapped comment
# would lose its "#" and the pasted file would not parse)
PLAIN = {"markup": False, "highlight": False, "soft_wrap": True}


def recipes_command(args, console) -> None:
    """`recipes [list]`, `recipes show RECIPE [--set ...]`, `recipes keys`."""
    if args.recipes_command == "show":
        recipe = load_recipe(args.recipe, args.overrides)
        given = " ".join(f"--set {o}" for o in args.overrides)
        console.print(f"# fastcifar recipes show {args.recipe} {given}".rstrip() + ": the recipe as `fastcifar train`"
                      " runs it, every key explicit", **PLAIN)
        console.print(f"# data.store: {store_note(recipe.data.store)}", **PLAIN)
        if "auto" in (recipe.data.mean, recipe.data.std):
            console.print('# data.mean / data.std "auto": the store\'s training statistics, filled in when the run '
                          "starts (its recipe.toml records the numbers)", **PLAIN)
        console.print(recipe_to_toml(recipe), **PLAIN, end="")
        return
    if args.recipes_command == "keys":  # valid TOML (dotted keys), one key a line: grep-able, a template
        rows = key_reference(Recipe)
        width = max(len(f"{r['key']} = {r['default']}") for r in rows if r["type"] != "section")
        lines = ["# Every recipe key: KEY = DEFAULT  # TYPE: meaning. Change one with --set KEY=VALUE; see one "
                 "recipe's values with fastcifar recipes show NAME."]
        for r in rows:
            if r["type"] == "section":
                lines += ["", f"# {r['key']} {r['meaning']}"]
            else:
                lines.append(f"{r['key'] + ' = ' + r['default']:<{width}}  # {r['type']}: {r['meaning']}")
        console.print("\n".join(lines), **PLAIN)
        return
    title = "built-in recipes: fastcifar train NAME (fastcifar recipes show NAME prints one)"
    recipes = {name: recipe_description(text) for name, text in builtin_recipes().items()}
    if not console.is_terminal:  # a table in a file is as wide as its longest description (1,608 characters)
        width = max(map(len, recipes))
        console.print("\n".join([f"# {title}", *(f"{name:<{width}}  {what}" for name, what in recipes.items())]),
                      **PLAIN)
        return
    table = Table(title=title)
    table.add_column("name")
    table.add_column("what")
    for name, what in recipes.items():
        table.add_row(name, escape(what))
    console.print(table)


def store_note(store: str) -> str:
    """Where data.store is found from here, or why it is not (the hint that fixes it)."""
    try:
        return f"found at {locate_store(store)}"
    except DataError as e:
        return str(e).removeprefix("data.store: ")
