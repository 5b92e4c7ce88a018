//! Small text helpers shared by messages and transcripts.

/// `s` cut to `max` characters, with `…` when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn clips_on_characters() {
        assert_eq!(super::clip("héllo", 10), "héllo");
        assert_eq!(super::clip("héllo", 2), "hé…");
    }
}
