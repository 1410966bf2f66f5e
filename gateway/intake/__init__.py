"""Intake: an accepted message written to the mail log, its raw bytes and recipients in one transaction
before `250` (`writer`, group commit; `store`, the ORM's way and the log of refusals; `rows`, the rows
themselves), its scan sent once the commit is done."""
