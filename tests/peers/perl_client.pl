#!/usr/bin/perl
# Gearman client peer for the interop tests (Perl Gearman::Client).
# Usage: perl perl_client.pl HOST PORT FUNC MODE PAYLOAD [UNIQUE]
#   MODE: fg (do_task) | bg (dispatch_background) | high (do_task, high_priority)
# Prints one JSON line: {"event":"result", ...}; payloads and results are base64.
use strict;
use warnings;
use Gearman::Client;
use JSON::PP;
use MIME::Base64;

my ($host, $port, $func, $mode, $payload, $uniq) = @ARGV;
$| = 1;
my $client = Gearman::Client->new(job_servers => ["$host:$port"]);
my %opts = (timeout => 10);
$opts{uniq} = $uniq if defined $uniq;
my %out = (event => "result", mode => $mode);
if ($mode eq "bg") {
    my $handle = $client->dispatch_background($func, $payload, \%opts);
    $out{handle} = $handle;
    $out{ok} = defined $handle ? JSON::PP::true : JSON::PP::false;
} else {
    $opts{high_priority} = 1 if $mode eq "high";
    my $failed = 0;
    $opts{on_fail} = sub { $failed = 1 };
    my $ref = $client->do_task($func, $payload, \%opts);
    $out{ok} = defined $ref ? JSON::PP::true : JSON::PP::false;
    $out{data_b64} = encode_base64(defined $ref ? $$ref : "", "");
    $out{failed} = $failed ? JSON::PP::true : JSON::PP::false;
}
print encode_json(\%out), "\n";
