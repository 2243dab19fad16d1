"""The embedded demo model: the ShapesWorld renderer, its training and its evaluation."""
