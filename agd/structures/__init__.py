"""From formula to DFT: template structures, substitution, CHGNet energies, VASP inputs and results."""
