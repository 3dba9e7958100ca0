//! hearth-image (to be filled)
