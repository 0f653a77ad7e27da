//! Image sizes written as `WxH` (the CLI's SDXL size flags, the OpenAI API's `size`).

/// `"WxH"` (either case of x, spaces allowed around the numbers) to (width, height).
pub fn parse_wxh(text: &str) -> Option<(usize, usize)> {
    let (w, h) = text.trim().split_once(['x', 'X'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::parse_wxh;

    #[test]
    fn sizes() {
        assert_eq!(parse_wxh("512x768"), Some((512, 768)));
        assert_eq!(parse_wxh(" 64X64 "), Some((64, 64)));
        assert_eq!(parse_wxh("1024 x 576"), Some((1024, 576)));
        for bad in ["512", "ax5", "-5x5", "5x", "x5", ""] {
            assert_eq!(parse_wxh(bad), None, "{bad}");
        }
    }
}
