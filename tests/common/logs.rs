//! Log capture: everything a test binary logs, at TRACE, from every crate,
//! as plain text (no colours), for tests that read the access log.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

/// Installs the capturing subscriber on first use (call it before spawning
/// an app) and returns what was logged so far by every test of this binary.
pub fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .init();
        logs
    })
}

/// The captured text so far.
pub fn text() -> String {
    String::from_utf8(captured().lock().unwrap().clone()).unwrap()
}

/// The one access-log line of the request whose `X-Request-Id` was `request_id`.
pub fn access_line(request_id: &str) -> String {
    let needle = format!("request_id=\"{request_id}\"");
    let text = text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&needle) && l.contains(" request "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one access-log line for {request_id}: {lines:?}\n{text}"
    );
    lines[0].to_owned()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
