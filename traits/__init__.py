"""Bundled trait kits and the loader for kit files and upstream trait folders."""

from pertoken.traits.kit import (
    Trait,
    fill_rubric,
    list_traits,
    load_trait,
    require_eval_questions,
)

__all__ = ["Trait", "fill_rubric", "list_traits", "load_trait", "require_eval_questions"]
