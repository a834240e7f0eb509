"""The ``kontod`` command line: the top of the house, which wires everything below it."""
