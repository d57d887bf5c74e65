//! How a log line starts when the worker styles it: `prefix` with `çN-`
//! colour escapes and `log_time_format` (strftime tokens, in UTC like the
//! default RFC 3339 stamp). Pure text, so it is unit-tested here.

use std::time::{SystemTime, UNIX_EPOCH};

/// The SGR sequence that ends a coloured part, so a colour never bleeds into
/// the app's own text.
const RESET: &str = "\x1b[0m";

/// `text` with each `çN-` (N a 256-colour index, 0 to 255) turned into the
/// terminal's colour sequence, or left out when `colour` is false
/// (`strip_ansi`); a coloured text ends with a reset. Anything else that
/// starts with `ç` stays as written.
pub fn colours(text: &str, colour: bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut coloured = false;
    let mut rest = text;
    while let Some(at) = rest.find('ç') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 'ç'.len_utf8()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let index = after[..digits].parse::<u8>().ok();
        match index.filter(|_| digits > 0 && after[digits..].starts_with('-')) {
            Some(index) => {
                if colour {
                    out.push_str(&format!("\x1b[38;5;{index}m"));
                    coloured = true;
                }
                rest = &after[digits + 1..];
            }
            None => {
                out.push('ç');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    if coloured {
        out.push_str(RESET);
    }
    out
}

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC calendar time, to the millisecond.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    milli: u32,
    weekday: usize,
    day_of_year: u32,
    unix: u64,
}

impl Civil {
    fn at(time: SystemTime) -> Civil {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let unix = since.as_secs();
        let days = (unix / 86_400) as i64;
        // Howard Hinnant's days-to-civil, for the proleptic Gregorian calendar.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = BEFORE[month as usize - 1] + day + u32::from(leap && month > 2);
        let in_day = unix % 86_400;
        Civil {
            year,
            month,
            day,
            hour: in_day / 3_600,
            minute: in_day / 60 % 60,
            second: in_day % 60,
            milli: since.subsec_millis(),
            weekday: (days + 4).rem_euclid(7) as usize,
            day_of_year,
            unix,
        }
    }
}

/// `format` with its strftime tokens replaced by `time` in UTC: `%Y %y %m
/// %d %e %H %I %M %S %L` (milliseconds, also `%3f`) `%p %j %a %A %b %B %F
/// %T %s %z %:z %Z %%`. An unknown token stays as written, so a typo shows in the log
/// instead of vanishing.
pub fn strftime(format: &str, time: SystemTime) -> String {
    let t = Civil::at(time);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(token) = chars.next() else {
            out.push('%');
            break;
        };
        let text = match token {
            'Y' => t.year.to_string(),
            'y' => format!("{:02}", t.year.rem_euclid(100)),
            'm' => format!("{:02}", t.month),
            'd' => format!("{:02}", t.day),
            'e' => format!("{:>2}", t.day),
            'H' => format!("{:02}", t.hour),
            'I' => format!("{:02}", (t.hour + 11) % 12 + 1),
            'M' => format!("{:02}", t.minute),
            'S' => format!("{:02}", t.second),
            'L' => format!("{:03}", t.milli),
            'p' => if t.hour < 12 { "AM" } else { "PM" }.to_owned(),
            'j' => format!("{:03}", t.day_of_year),
            'a' => DAYS[t.weekday][..3].to_owned(),
            'A' => DAYS[t.weekday].to_owned(),
            'b' => MONTHS[t.month as usize - 1][..3].to_owned(),
            'B' => MONTHS[t.month as usize - 1].to_owned(),
            'F' => format!("{}-{:02}-{:02}", t.year, t.month, t.day),
            'T' => format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            's' => t.unix.to_string(),
            'z' => "+0000".to_owned(),
            // chrono's spellings, which `apm convert` writes for PM2's
            // `log_date_format`: milliseconds and an offset with a colon.
            '3' if chars.as_str().starts_with('f') => {
                chars.next();
                format!("{:03}", t.milli)
            }
            ':' if chars.as_str().starts_with('z') => {
                chars.next();
                "+00:00".to_owned()
            }
            'Z' => "UTC".to_owned(),
            '%' => "%".to_owned(),
            other => format!("%{other}"),
        };
        out.push_str(&text);
    }
    out
}

/// Which stream a line came from; shown in the line so a shared file can
/// still be read one stream at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

impl Stream {
    pub fn marker(self) -> &'static str {
        match self {
            Stream::Out => "|",
            Stream::Err => "!",
        }
    }
}

/// Appends `text` to `out` without its ANSI escape sequences: CSI (`ESC [`
/// … a final byte, colours among them), OSC (`ESC ]` … BEL or `ESC \\`,
/// terminal titles and links) and two-byte escapes.
pub(crate) fn strip_ansi(text: &[u8], out: &mut Vec<u8>) {
    const ESC: u8 = 0x1b;
    let mut i = 0;
    while i < text.len() {
        if text[i] != ESC {
            out.push(text[i]);
            i += 1;
            continue;
        }
        i += 1;
        match text.get(i) {
            Some(b'[') => {
                // Parameters and intermediates, then one final byte.
                i += 1;
                while i < text.len() && !(0x40..=0x7e).contains(&text[i]) {
                    i += 1;
                }
                i += 1;
            }
            Some(b']') => {
                i += 1;
                while i < text.len()
                    && text[i] != 0x07
                    && !(text[i] == ESC && text.get(i + 1) == Some(&b'\\'))
                {
                    i += 1;
                }
                i += if text.get(i) == Some(&ESC) { 2 } else { 1 };
            }
            Some(_) => i += 1,
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripped(text: &[u8]) -> String {
        let mut out = Vec::new();
        strip_ansi(text, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strip_ansi_leaves_the_text_of_coloured_and_titled_lines() {
        assert_eq!(stripped(b"\x1b[1;31mred\x1b[0m plain"), "red plain");
        assert_eq!(stripped(b"\x1b]0;title\x07after"), "after");
        assert_eq!(
            stripped(b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\"),
            "link"
        );
        assert_eq!(stripped(b"a\x1bMb"), "ab");
        assert_eq!(stripped("naïve \u{1b}[2Kdone".as_bytes()), "naïve done");
        // Cut off mid-sequence: nothing of it is kept, nothing panics.
        assert_eq!(stripped(b"x\x1b[12"), "x");
        assert_eq!(stripped(b"x\x1b"), "x");
        assert_eq!(stripped(b"x\x1b]title"), "x");
    }
    use std::time::Duration;

    fn at(unix_ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(unix_ms)
    }

    #[test]
    fn strftime_writes_each_token_in_utc() {
        // 2024-02-29T13:05:09.042Z, a Thursday, the 60th day of a leap year.
        let t = at(1_709_211_909_042);
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S.%L", t),
            "2024-02-29 13:05:09.042"
        );
        assert_eq!(strftime("%F %T %z %Z", t), "2024-02-29 13:05:09 +0000 UTC");
        assert_eq!(
            strftime("%a %A %b %B %e %j %y", t),
            "Thu Thursday Feb February 29 060 24"
        );
        assert_eq!(strftime("%I %p %s %% %q", t), "01 PM 1709211909 % %q");
        assert_eq!(strftime("trailing %", t), "trailing %");
        assert_eq!(strftime("%S.%3f%:z %3x", t), "09.042+00:00 %3x");
        // Midnight is 12 AM; the epoch was a Thursday; 31 December of a leap year is day 366.
        assert_eq!(strftime("%I %p %a %F", at(0)), "12 AM Thu 1970-01-01");
        assert_eq!(strftime("%j %F", at(1_735_603_200_000)), "366 2024-12-31");
        assert_eq!(strftime("%j %F", at(951_782_400_000)), "060 2000-02-29");
    }

    #[test]
    fn colour_escapes_become_sequences_or_go() {
        assert_eq!(colours("ç208-api", true), "\x1b[38;5;208mapi\x1b[0m");
        assert_eq!(colours("ç208-api ç2-#1", false), "api #1");
        assert_eq!(colours("plain", true), "plain");
        // Not escapes: no digits, no dash, an index beyond 255, a lone ç.
        for text in ["ç-a", "ç12a", "ç256-x", "façade ç"] {
            assert_eq!(colours(text, true), text);
        }
    }
}
