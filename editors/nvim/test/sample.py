"""Small inventory helpers: the file that the Neovim test opens and types into."""

from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int


def total_value(items: list[Item]) -> float:
    """The value of all items in stock."""
    return sum(item.price * item.quantity for item in items)


def cheapest(items: list[Item]) -> Item:
    """The item with the lowest price."""
    return min(items, key=lambda item: item.price)


def most_expensive(items: list[Item]) -> Item:
    """The item with the highest price."""
