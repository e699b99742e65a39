"""The production loop: SFT, preference matrix, decide, safety and regression gate, ship (and rounds), resumable."""
