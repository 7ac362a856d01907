package Ratepool::Conversation;

# Claude-Code-like conversations for the tests: tools, system blocks of
# which the last two are marked for caching, and messages whose last
# block is marked too; every turn sends it all again, and grows it by an
# answer and a new user message.
#
#   my $c = Ratepool::Conversation->new('seed', session => 'id',
#                                       system => 'shared');
#   my $r = $c->turn($t, token => $TOKEN, headers => [...]);

use strict;
use warnings;

use JSON::PP;

my $JSON = JSON::PP->new->utf8->canonical;
my $EPHEMERAL = { type => 'ephemeral' };

# ASCII text of exactly $bytes bytes, different for each $seed
sub filler {
    my ($bytes, $seed) = @_;
    my ($s, $i) = ('', 0);
    $s .= "$seed-" . $i++ . ' ' while length $s < $bytes;
    return substr $s, 0, $bytes;
}

sub text { { type => 'text', text => filler(@_) } }

my @TOOLS = map { { name => "tool_$_", description => filler(4000, "tool$_"),
                    input_schema => { type => 'object' } } } 1 .. 2;

sub new {
    my ($class, $seed, %opt) = @_;
    my $system = $opt{system} // 'shared';

    return bless {
        seed => $seed, session => $opt{session},
        system => [ text(400, "$system-0"),
                    { %{ text(6000, "$system-1") },
                      cache_control => $EPHEMERAL },
                    { %{ text(6000, "$system-2") },
                      cache_control => $EPHEMERAL } ],
        messages => [ { role => 'user',
                        content => [ text(2000, "$seed-u0") ] } ],
    }, $class;
}

sub messages { $_[0]{messages} }

# the body of the next turn, as JSON
sub body {
    my ($self) = @_;
    my @messages = map { { role => $_->{role},
                           content => [ map { {%$_} } @{ $_->{content} } ] } }
                   @{ $self->{messages} };
    $messages[-1]{content}[-1]{cache_control} = $EPHEMERAL;

    return $JSON->encode({ model => 'claude-sonnet-4-6', max_tokens => 64,
                           tools => \@TOOLS, system => $self->{system},
                           messages => \@messages });
}

# sends the next turn through a gateway; on success an answer and a new
# user message of about 4 KB join the conversation
sub turn {
    my ($self, $t, %opt) = @_;
    my $n = @{ $self->{messages} };

    my $r = $t->messages(token => $opt{token},
        headers => [ $self->{session}
                         ? ('x-claude-code-session-id' => $self->{session})
                         : (),
                     @{ $opt{headers} || [] } ],
        body => $self->body);

    if ($r->{status} == 200) {
        push @{ $self->{messages} },
            { role => 'assistant',
              content => [ text(600, "$self->{seed}-a$n") ] },
            { role => 'user', content => [ text(4000, "$self->{seed}-u$n") ] };
    }

    return $r;
}

1;
