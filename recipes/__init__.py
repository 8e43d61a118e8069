"""The built-in recipes: this folder is the source, installed as the package fastcifar.recipes, so a recipe's name
(`fastcifar train quickstart`) works wherever fastcifar is installed; `fastcifar recipes` lists them."""
