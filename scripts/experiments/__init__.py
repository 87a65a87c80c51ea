"""Experiments on the toy-digits world whose tables and pictures the README quotes."""
