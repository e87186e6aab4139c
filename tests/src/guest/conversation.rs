//! The shell protocol on the serial console. Each command is sent as
//!
//! ```text
//! printf '__BH_%s_%u__\n' B 7; (
//! <command>
//! ) </dev/null 2>/tmp/.bh_stderr; __bh=$?; printf '__BH_%s_%u__\n' E 7; cat /tmp/.bh_stderr; printf '__BH_%s_%u__ %d\n' X 7 $__bh
//! ```
//!
//! and the answer is what lies between the markers `__BH_B_7__`, `__BH_E_7__` (stdout),
//! `__BH_X_7__ <status>` (stderr before it). The markers are assembled by `printf`, so the
//! command's own text (should the tty ever echo it) never contains them; the id makes stale
//! output of an earlier, timed-out command unmistakable. The command runs in a subshell with
//! stdin from /dev/null, so it can neither read the following console input nor exit the
//! shell; the price is that `cd` or `export` do not carry over to the next command.

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdOutput {
    pub stdout: String,
    /// Kept apart from stdout, so parsing stdout is not disturbed by warnings.
    pub stderr: String,
    pub status: i32,
}

/// The text to write to the console for command number `id`.
pub(crate) fn wrap(id: u64, cmd: &str) -> String {
    format!(
        "printf '__BH_%s_%u__\\n' B {id}; (\n{cmd}\n) </dev/null 2>/tmp/.bh_stderr; __bh=$?; \
         printf '__BH_%s_%u__\\n' E {id}; cat /tmp/.bh_stderr; printf '__BH_%s_%u__ %d\\n' X {id} $__bh\n"
    )
}

/// The command's result, once the console text (from before it was sent) holds all of it.
pub(crate) fn parse(text: &str, id: u64) -> Option<CmdOutput> {
    let begin = format!("__BH_B_{id}__\n");
    let end = format!("__BH_E_{id}__\n");
    let exit = format!("__BH_X_{id}__ ");
    let start = text.find(&begin)? + begin.len();
    // A command's output need not end in a newline, so the end marker may follow it directly.
    let stdout_len = text.get(start..)?.find(&end)?;
    let stdout = text.get(start..start + stdout_len)?;
    let stderr_start = start + stdout_len + end.len();
    let stderr_len = text.get(stderr_start..)?.find(&exit)?;
    let stderr = text.get(stderr_start..stderr_start + stderr_len)?;
    let status_start = stderr_start + stderr_len + exit.len();
    let status_line = text.get(status_start..)?;
    let status = status_line
        .get(..status_line.find('\n')?)?
        .trim()
        .parse()
        .ok()?;
    Some(CmdOutput {
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        status,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_between_markers_despite_noise() {
        let text = "junk __BH_B_6__\nold\n__BH_PROMPT__ __BH_B_7__\nhello\nno newline\
                    __BH_E_7__\noops\n__BH_X_7__ 3\n__BH_PROMPT__ ";
        let out = parse(text, 7).unwrap();
        assert_eq!(out.stdout, "hello\nno newline");
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(out.status, 3);
    }

    #[test]
    fn incomplete_output_is_not_an_answer() {
        assert_eq!(
            parse("__BH_B_7__\nhello\n__BH_E_7__\n__BH_X_7__ 1", 7),
            None
        );
        assert_eq!(parse("__BH_B_17__\n__BH_E_17__\n__BH_X_17__ 0\n", 7), None);
    }

    #[test]
    fn echoed_command_contains_no_marker() {
        let sent = wrap(7, "echo hi");
        assert!(!sent.contains("__BH_B_7__") && !sent.contains("__BH_X_7__"));
    }
}
