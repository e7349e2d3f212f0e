"""Side-by-side comparisons on one model and one text: integer menus
(``integer``: scorers x quantizers x budgets beside the baselines) and
llama.cpp's presets against bitalloc plans at their exact sizes (``gguf``);
``report`` holds the text tables both print and their staged error tables."""
