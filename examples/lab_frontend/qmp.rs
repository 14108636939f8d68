//! A QMP client of one command, for the nested lab's L1.

use std::time::{Duration, Instant};

use crate::scenario::Error;

/// `qmp SOCKET COMMAND [ARGUMENTS]`: runs one QMP command on QEMU's monitor, ARGUMENTS (a JSON
/// object) as its arguments, and prints `QMP ms=N REPLY`, N the milliseconds from sending the
/// command to its reply; for the nested lab's L1, which has no QMP client. Every read has a 10 s
/// deadline.
pub(crate) fn qmp(args: &[String]) -> Result<(), Error> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let (socket, command, arguments) = match args {
        [socket, command] => (socket, command, None),
        [socket, command, arguments] => (socket, command, Some(arguments)),
        _ => return Err("qmp SOCKET COMMAND [ARGUMENTS]".into()),
    };
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // Events may come before a reply; the reply is the first line with "return" or "error".
    let mut reply = || -> Result<String, Error> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err("QEMU closed the monitor".into());
            }
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return Ok(line.trim_end().to_string());
            }
        }
    };
    // The greeting has neither, so the first reply read is that of qmp_capabilities.
    writeln!(writer, "{{\"execute\": \"qmp_capabilities\"}}")?;
    reply()?;
    let start = Instant::now();
    match arguments {
        Some(arguments) => writeln!(
            writer,
            "{{\"execute\": \"{command}\", \"arguments\": {arguments}}}"
        )?,
        None => writeln!(writer, "{{\"execute\": \"{command}\"}}")?,
    }
    let answer = reply()?;
    println!("QMP ms={} {answer}", start.elapsed().as_millis());
    Ok(())
}
