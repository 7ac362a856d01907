#!/usr/bin/perl

# Tokens the provider reports are read from its answers as they pass,
# JSON bodies and SSE streams split at awkward bytes alike, and counted
# for the key, its org and the workspace; a client that leaves mid-stream
# is charged what the provider reported up to then.

use strict;
use warnings;

use lib 't/lib';

use IO::Socket::INET;
use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-u1-' . Ratepool::Test::random_hex(8);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(backend ci);

my $mock = $t->start_mock(port => 1, config => {
    keys => { $KEY => { org => 'org-u', name => 'u1' } },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format usage 'ws=\$ratepool_workspace in=\$ratepool_input_tokens '
                     'out=\$ratepool_output_tokens '
                     'cr=\$ratepool_cache_read_tokens '
                     'cc=\$ratepool_cache_creation_tokens';

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key u1 org=org-u server=127.0.0.1:%%PORT_1%% key=$KEY;
        keepalive 4;
    }

    ratepool_workspace backend;
    ratepool_workspace ci;
    ratepool_client backend ${\ $t->token_hash($TOKEN{backend})};
    ratepool_client ci ${\ $t->token_hash($TOKEN{ci})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            access_log %%TESTDIR%%/usage.log usage;
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub usage_header { [ 'x-mock-usage' => encode_json({ @_ }) ] }

sub used {
    my $s = $t->status;
    return {
        key => $s->{pools}[0]{keys}[0]{tokens},
        org => $s->{pools}[0]{orgs}[0]{tokens},
        ws  => Ratepool::Test::by_name($s->{workspaces}),
    };
}

# a JSON answer

my $r = $t->messages(token => $TOKEN{backend}, headers => usage_header(
    input_tokens => 1234, output_tokens => 56,
    cache_read_input_tokens => 7000, cache_creation_input_tokens => 89));

is($r->{status}, 200, 'a JSON answer');

# counted before the last byte reaches the client
my $u = used();
is_deeply($u->{key},
    { input => 1234, output => 56, cache_read => 7000, cache_creation => 89 },
    'its usage is counted for the key');
is_deeply($u->{org}, $u->{key}, 'and for the key\'s org');
is_deeply($u->{ws}{backend}{tokens}, $u->{key}, 'and for the workspace');
is($u->{ws}{ci}{tokens}{input}, 0, 'and not for another workspace');

# a stream, split by the mock inside events, JSON and numbers

$r = $t->messages(token => $TOKEN{ci}, stream => 1,
                  body => { stream => JSON::PP::true }, headers => [
    'x-mock-stream-delay-ms' => 5,
    @{ usage_header(input_tokens => 4321, output_tokens => 987,
                    cache_read_input_tokens => 1000,
                    cache_creation_input_tokens => 0) } ]);

is($r->{status}, 200, 'a streamed answer');
like($r->{body}, qr/event: message_stop/, 'arrives complete');

$u = used();

is_deeply($u->{ws}{ci}{tokens},
    { input => 4321, output => 987, cache_read => 1000, cache_creation => 0 },
    'its usage is read exactly from message_start and the last '
    . 'message_delta');
is($u->{key}{input}, 1234 + 4321, 'the key\'s count adds up both answers');
is($u->{key}{output}, 56 + 987, 'input and output alike');

# a stream the client leaves after the first events

$mock->reset;

my $body = encode_json({ model => 'claude-sonnet-4-6', max_tokens => 500,
                         stream => JSON::PP::true, messages => [] });
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port(0))
    or die "connect: $!\n";
print $s "POST /v1/messages HTTP/1.1\r\nHost: gw\r\n"
    . "x-api-key: $TOKEN{ci}\r\nanthropic-version: 2023-06-01\r\n"
    . "x-mock-stream-delay-ms: 300\r\n"
    . "x-mock-usage: {\"input_tokens\": 500, \"output_tokens\": 900}\r\n"
    . "Content-Type: application/json\r\n"
    . 'Content-Length: ' . length($body) . "\r\n\r\n$body";

# read until the whole message_start event, which carries the input
# usage, has arrived, then leave
my ($raw, $events) = ('', '');
my $deadline = time + 5;
while (time < $deadline && $events !~ /event: message_start\n[^\n]*\n\n/) {
    sysread($s, $raw, 4096, length $raw) or last;
    $events = Ratepool::Test::dechunk($raw =~ /\r\n\r\n(.*)\z/s ? $1 : '');
}
close $s;

like($events, qr/message_start/, 'a client reads the first event of a stream');
unlike($events, qr/message_delta/, 'and leaves before the last');

my $ci;
$deadline = time + 5;
do {
    sleep 0.2;
    $ci = used()->{ws}{ci}{tokens};
} until $ci->{input} > 4321 || time > $deadline;

is($ci->{input}, 4321 + 500,
    'and leaves: it is charged the input the provider reported');
is($ci->{output}, 987 + 1,
    'and the output reported before it left, not the whole answer');

# the access log

my @lines = split /\n/, $t->read_file('usage.log');
is($lines[0], 'ws=backend in=1234 out=56 cr=7000 cc=89',
    'the access log shows the usage of a JSON answer');
is($lines[1], 'ws=ci in=4321 out=987 cr=1000 cc=0',
    'and of a stream');

$t->stop;
$t->check_log;

done_testing;
