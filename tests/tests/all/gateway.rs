//! Named end-to-end behaviours.
