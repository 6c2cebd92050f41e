//! Stop strings over streamed text, held back across token boundaries.
//!
//! Detokenized text arrives in arbitrary pieces, so a stop string can straddle several of
//! them. [`StopMatcher`] emits text as soon as it can no longer be the start of a stop string
//! and holds back the rest: the longest suffix of what it has seen that is a proper prefix of
//! some stop string. When a stop string appears (the earliest occurrence over all of them),
//! the text before it is released and the stop string and everything after are dropped
//! (OpenAI semantics). Text is only ever split on `char` boundaries.

/// Finds stop strings in a stream of text pieces.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Length in bytes of the longest stop string.
    max_stop_len: usize,
    /// Text seen but not released yet; always shorter than `max_stop_len`.
    held: String,
    stopped: bool,
}

/// What one [`StopMatcher::push`] allows to emit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to emit now.
    pub text: String,
    /// A stop string matched; `text` is everything before it that was not emitted yet.
    /// Once stopped, later pushes return empty text and `stopped == true`.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_stop_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            max_stop_len,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                text: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                text: text.to_owned(),
                stopped: false,
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);

        // No stop lies entirely inside the held text (it would have matched earlier), so
        // searching the whole buffer only finds new matches.
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| buf.find(stop.as_str()))
            .min();
        if let Some(start) = earliest {
            buf.truncate(start);
            self.stopped = true;
            return StopOutcome {
                text: buf,
                stopped: true,
            };
        }

        let hold_from = self.hold_start(&buf);
        self.held = buf.split_off(hold_from);
        StopOutcome {
            text: buf,
            stopped: false,
        }
    }

    /// End of stream: releases whatever was held back (nothing after a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Byte index where the longest suffix of `buf` that is a prefix of a stop string starts
    /// (`buf.len()` when there is none). Only the last `max_stop_len - 1` bytes can qualify.
    fn hold_start(&self, buf: &str) -> usize {
        let earliest = buf.len().saturating_sub(self.max_stop_len - 1);
        buf.char_indices()
            .map(|(i, _)| i)
            .skip_while(|&i| i < earliest)
            .find(|&i| {
                let suffix = &buf[i..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(buf.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    fn push(m: &mut StopMatcher, text: &str) -> (String, bool) {
        let out = m.push(text);
        (out.text, out.stopped)
    }

    #[test]
    fn stop_split_across_two_pushes() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(push(&mut m, "hello ST"), ("hello ".into(), false));
        assert_eq!(push(&mut m, "OP and more"), ("".into(), true));
        assert!(m.is_stopped());
        assert_eq!(push(&mut m, "later"), ("".into(), true));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_split_across_three_pushes() {
        let mut m = matcher(&["<end>"]);
        assert_eq!(push(&mut m, "a<"), ("a".into(), false));
        assert_eq!(push(&mut m, "en"), ("".into(), false));
        assert_eq!(push(&mut m, "d>b"), ("".into(), true));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = matcher(&["<end>"]);
        assert_eq!(push(&mut m, "a<en"), ("a".into(), false));
        assert_eq!(push(&mut m, "x"), ("<enx".into(), false));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn earliest_of_several_overlapping_stops() {
        let mut m = matcher(&["abcd", "bc", "cdx"]);
        // "ab" could start "abcd"; "b" alone could start "bc": hold the longest.
        assert_eq!(push(&mut m, "zzab"), ("zz".into(), false));
        // "abc" holds "bc", which matches: text before "bc" is "a".
        assert_eq!(push(&mut m, "c"), ("a".into(), true));

        let mut m = matcher(&["world", "lo w"]);
        assert_eq!(push(&mut m, "hello world"), ("hel".into(), true));
        let mut m = matcher(&["xyz", "yz!"]);
        assert_eq!(push(&mut m, "axy"), ("a".into(), false));
        assert_eq!(push(&mut m, "z!"), ("".into(), true));
    }

    #[test]
    fn stop_at_the_very_start() {
        let mut m = matcher(&["###"]);
        assert_eq!(push(&mut m, "###tail"), ("".into(), true));
        let mut m = matcher(&["###"]);
        assert_eq!(push(&mut m, "#"), ("".into(), false));
        assert_eq!(push(&mut m, "##"), ("".into(), true));
    }

    #[test]
    fn holds_back_no_more_than_the_longest_prefix() {
        let mut m = matcher(&["abc"]);
        assert_eq!(push(&mut m, "xxab"), ("xx".into(), false));
        let mut m = matcher(&["abc"]);
        assert_eq!(push(&mut m, "xxb"), ("xxb".into(), false));
        let mut m = matcher(&["aab"]);
        // "aaa": only the last "aa" can still start "aab".
        assert_eq!(push(&mut m, "aaa"), ("a".into(), false));
        assert_eq!(push(&mut m, "b"), ("".into(), true));
        let mut m = matcher(&["", "end"]);
        assert_eq!(push(&mut m, "the e"), ("the ".into(), false));
        assert_eq!(m.flush(), "e");
    }

    #[test]
    fn multi_byte_characters() {
        let mut m = matcher(&["世界"]);
        assert_eq!(push(&mut m, "你好世"), ("你好".into(), false));
        assert_eq!(push(&mut m, "界!"), ("".into(), true));
        let mut m = matcher(&["é!", "🎉🎊"]);
        assert_eq!(push(&mut m, "café"), ("caf".into(), false));
        assert_eq!(push(&mut m, "🎉"), ("é".into(), false));
        assert_eq!(push(&mut m, "x"), ("🎉x".into(), false));
        assert_eq!(push(&mut m, "🎉"), ("".into(), false));
        assert_eq!(push(&mut m, "🎊 ok"), ("".into(), true));
        // A stop string sharing a first byte with the text's char must not split it.
        let mut m = matcher(&["éa"]);
        assert_eq!(push(&mut m, "è"), ("è".into(), false));
    }

    #[test]
    fn flush_releases_held_text_and_no_stops_pass_through() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(push(&mut m, "abcST"), ("abc".into(), false));
        assert_eq!(m.flush(), "ST");
        assert_eq!(m.flush(), "");
        let mut m = matcher(&[]);
        assert_eq!(push(&mut m, "anything"), ("anything".into(), false));
        assert_eq!(m.flush(), "");
    }
}
